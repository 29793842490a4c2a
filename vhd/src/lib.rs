//! The VHD disk format.
