//! SMTP command lines (smtp-proto's receiver as the listener drives it) and DATA sections.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| switchboard::fuzzing::smtp_session(data));
