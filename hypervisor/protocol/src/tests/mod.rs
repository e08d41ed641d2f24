//! Host tests of the protocol: the simulator, unit tests of each exchange and of malformed
//! requests, one test per cell of SemperOS's interference table, and systematic and random
//! exploration of interleavings.

mod batch;
mod explore;
mod interference;
mod sim;
mod unit;
