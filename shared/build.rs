//! The migrations are embedded at compile time (`sqlx::migrate!` in `db.rs`): a new or changed
//! file in `migrations/` must rebuild this crate, or the binaries would run without it.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
