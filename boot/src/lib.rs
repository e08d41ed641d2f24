//! Boot information for the null-Kernel hypervisor (placeholder, being written).
#![cfg_attr(not(test), no_std)]
