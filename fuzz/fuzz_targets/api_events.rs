//! JSON `POST /v1/events` bodies (one event or a batch) through to records.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| switchboard::fuzzing::api_events(data));
