//! The launcher's own lines on stderr, as scripts/lib.sh prints them: `==> step` in bold,
//! `=== section` in cyan after a blank line, `warning:` in yellow, `error:` in red.

/// A step (`say`).
pub fn say(text: &str) {
    eprintln!("\x1b[1m==> {text}\x1b[0m");
}

/// The start of a stage of a long run (`section`).
pub fn section(text: &str) {
    eprintln!("\n\x1b[1;36m=== {text}\x1b[0m");
}

/// Something that goes on anyway (`warn`).
pub fn warn(text: &str) {
    eprintln!("\x1b[33mwarning:\x1b[0m {text}");
}

/// What stopped the launcher (`die`, without the exit: the caller stops what it started).
pub fn error(text: &str) {
    eprintln!("\x1b[31merror:\x1b[0m {text}");
}
