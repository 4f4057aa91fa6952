#![no_main]
//! See `roboger_tests::fuzz::chat_code`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| roboger_tests::fuzz::chat_code(data));
