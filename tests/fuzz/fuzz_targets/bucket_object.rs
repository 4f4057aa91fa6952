#![no_main]
//! See `roboger_tests::fuzz::bucket_object`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| roboger_tests::fuzz::bucket_object(data));
