//! Vonage inbound SMS parameters (form, or JSON when the input starts with `{`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| switchboard::fuzzing::vonage(data));
