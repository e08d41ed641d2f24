//! `vmbench ping` / `vmbench pong`: the VM switch beside the lwC switch (issue 15,
//! `cargo xtask bench lwc`). Two VMs on one CPU ping-pong through the null-Kernel with the
//! guest-OS AM's directed yield (`yield_to`, a `vm` capability from `manages=`): the ping
//! times `yield_to(pong)` until its own turn comes back, which is two VM switches (the
//! pong's whole turn is one `yield_to(ping)`), as `lwswitch_instructions` times two
//! `lwSwitch` calls. The ping then destroys the pong.

use nk_guest::abi::guest_os_op::{DESTROY, YIELD_TO};
use nk_guest::nk::{self, Cap};
use nk_guest::println;

/// Returns the last initial capability: the `vm` capability `manages=` gave (after the
/// counter's and the exo AM's; the module line names one VM and nothing else).
fn peer() -> Option<(Cap, u16)> {
    (0..16).map_while(|i| nk::initial(i).ok()).last()
}

pub fn run(role: Option<&str>) {
    let Some((peer, am)) = peer() else {
        println!("GBENCH error: vmbench: no vm capability (manages=)");
        return;
    };
    match role {
        Some("ping") => {
            for _ in 0..3 {
                nk::call(am, YIELD_TO, &[peer], &[]);
            }
            let empty = crate::measure(|| {});
            let mut refused = None;
            let switch = crate::measure(|| {
                let reply = nk::call(am, YIELD_TO, &[peer], &[]);
                if !reply.status().is_ok() {
                    refused = Some(reply.status());
                }
            });
            match refused {
                Some(status) => println!("GBENCH error: vmbench: yield_to refused: {status}"),
                None => println!("GBENCH vm_switch_instructions {}", switch.saturating_sub(empty)),
            }
            let _ = nk::call(am, DESTROY, &[peer], &[]);
        }
        _ => {
            // Until the ping ends (then refused) or destroys this VM.
            for _ in 0..1_000 {
                if !nk::call(am, YIELD_TO, &[peer], &[]).status().is_ok() {
                    break;
                }
            }
        }
    }
}
