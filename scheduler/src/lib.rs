//! minisgl's scheduler.
