//! RFC 5322 / MIME messages to records.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| switchboard::fuzzing::mime_to_record(data));
