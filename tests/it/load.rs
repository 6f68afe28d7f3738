//! (issue 9) — filled in by its owner.
