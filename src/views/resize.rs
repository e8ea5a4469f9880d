//! Resize (being written).
