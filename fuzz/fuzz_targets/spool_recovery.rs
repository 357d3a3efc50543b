//! Spool recovery over an arbitrary segment file (and cursor): survey, open, read.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    switchboard::fuzzing::spool_recovery(dir.path(), data);
});
