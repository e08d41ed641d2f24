//! TEMPORARY shim until nk-boot lands: fixed layout for a first smoke boot.
pub struct Options {
    pub log_level: log::LevelFilter,
    pub cpus: Option<u32>,
    pub test: Option<&'static str>,
}
pub struct Reserved {
    pub start: u64,
    pub end: u64,
    pub label: &'static str,
}
pub struct Boot {
    pub info: u64,
    pub loader: &'static str,
    pub cmdline: &'static str,
    pub options: Options,
    pub rsdp_paddr: Option<u64>,
}
impl Boot {
    pub fn guests(&self) -> alloc::vec::Vec<crate::guest::GuestSpec> {
        let info = self.info;
        // SAFETY: shim only: the MBI is identity-mapped and GRUB-made.
        let total = unsafe { *(info as *const u32) } as u64;
        let mut out = alloc::vec::Vec::new();
        let mut at = info + 8;
        while at + 8 <= info + total {
            // SAFETY: shim only.
            let (ty, size) = unsafe { (*(at as *const u32), *((at + 4) as *const u32)) };
            if ty == 0 {
                break;
            }
            if ty == 3 {
                // SAFETY: shim only.
                let (start, end) = unsafe { (*((at + 8) as *const u32) as u64, *((at + 12) as *const u32) as u64) };
                // SAFETY: shim only.
                let cmd = unsafe { core::slice::from_raw_parts((at + 16) as *const u8, size as usize - 17) };
                let cmd = core::str::from_utf8(cmd).unwrap_or("guest");
                // SAFETY: shim only.
                let image = unsafe { core::slice::from_raw_parts(start as *const u8, (end - start) as usize) };
                match crate::guest::GuestSpec::from_cmdline(cmd, image) {
                    Ok(spec) => out.push(spec),
                    Err(e) => log::error!("module: {e}"),
                }
            }
            at += (size as u64 + 7) & !7;
        }
        out
    }
    pub fn diagnostics(&self) -> impl Iterator<Item = &'static str> {
        core::iter::empty()
    }
    pub fn log_memory_map(&self) {}
    pub fn usable_ranges(&self) -> impl Iterator<Item = (u64, u64)> + Clone {
        [(16u64 << 20, 56u64 << 20)].into_iter()
    }
    pub fn reserved(&self) -> impl Iterator<Item = Reserved> {
        core::iter::empty()
    }
    pub fn is_available(&self, _s: u64, _e: u64) -> bool {
        true
    }
}
pub fn load(magic: u64, info: u64) -> Result<Boot, &'static str> {
    log::info!("magic {magic:#x}");
    Ok(Boot {
        info,
        loader: "shim",
        cmdline: "",
        options: Options { log_level: log::LevelFilter::Trace, cpus: None, test: Some("all") },
        rsdp_paddr: None,
    })
}
