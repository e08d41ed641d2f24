//! The NVRAM AM (issue 12): persistent regions that callers map and work on at DRAM speed
//! and commit atomically, after PTx (seed null-kernel-ptx-lwc-thesis.txt, chapter 3) and
//! the null-Kernel's NVRAM calls (§5.4).
//!
//! DOCS-PLACEHOLDER
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod ptx;
pub mod testing;
