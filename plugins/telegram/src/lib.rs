//! The telegram plugin's parts that are worth reaching from outside its
//! executable: the chat codes, which the fuzz tests exercise.

pub mod chat_code;
