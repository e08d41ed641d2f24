//! `newam`: calls the AM that `cargo xtask new-am` generates, in a hypervisor built with
//! it (xtask's `new-am-roundtrip` scenario). The generated AM is the last one registered,
//! so its factory is this VM's initial capability with the highest AM id; the template's
//! operations are 0 `create(factory)`, 1 `get(thing)` and 2 `set(thing, value)`.

use nk_guest::nk::{self, Cap};
use nk_guest::println;

const CREATE: u32 = 0;
const GET: u32 = 1;
const SET: u32 = 2;

/// Finds the factory, creates a thing, sets it to 42 and reads it back.
pub fn run() {
    let mut newest: Option<(Cap, u16)> = None;
    let mut index = 0;
    while let Ok((cap, am)) = nk::initial(index) {
        if newest.is_none_or(|(_, best)| am > best) {
            newest = Some((cap, am));
        }
        index += 1;
    }
    let Some((factory, am)) = newest else {
        println!("GTEST FAILED newam: this VM has no initial capabilities");
        return;
    };
    let created = nk::call(am, CREATE, &[factory], &[]);
    if !created.status().is_ok() {
        println!("GTEST FAILED newam: create on AM {am}: {}", created.status());
        return;
    }
    let thing = created.name;
    let set = nk::call(am, SET, &[thing], &[42]).status();
    let got = nk::call(am, GET, &[thing], &[]);
    if set.is_ok() && got.status().is_ok() && got.results[0] == 42 {
        println!("GTEST ok newam: AM {am} created a thing, set it to 42 and read back {}", got.results[0]);
    } else {
        println!("GTEST FAILED newam: AM {am}: set {set}, get {} = {}", got.status(), got.results[0]);
    }
}
