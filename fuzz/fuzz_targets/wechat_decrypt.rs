//! WeChat `Encrypt` decryption (and the XML inside).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| switchboard::fuzzing::wechat_decrypt(data));
