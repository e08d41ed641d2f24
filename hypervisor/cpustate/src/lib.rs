//! Rules for the processor state a guest controls, as pure functions the hypervisor applies
//! at its VM exits and the host tests check: which XCR0 values XSETBV accepts (SDM Vol. 1
//! §13.3) and which event a VM exit cut short and the next entry must inject again (SDM
//! Vol. 3 §28.2.4), and the order and stacks of a VM's vCPUs.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod events;
pub mod vcpus;
pub mod xcr0;
