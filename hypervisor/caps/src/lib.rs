//! The null-Kernel capability core (placeholder, being written).
#![cfg_attr(not(test), no_std)]
