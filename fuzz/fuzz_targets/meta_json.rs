//! Meta (WhatsApp, Messenger, Instagram) webhook JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| switchboard::fuzzing::meta_json(data));
