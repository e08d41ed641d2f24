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
    pub loader: &'static str,
    pub cmdline: &'static str,
    pub options: Options,
    pub rsdp_paddr: Option<u64>,
}
impl Boot {
    pub fn guests(&self) -> impl Iterator<Item = crate::guest::GuestSpec<'static>> {
        core::iter::empty()
    }
    pub fn diagnostics(&self) -> impl Iterator<Item = &'static str> {
        core::iter::empty()
    }
    pub fn log_memory_map(&self) {}
    pub fn usable_ranges(&self) -> impl Iterator<Item = (u64, u64)> + Clone {
        [(8u64 << 20, 48u64 << 20)].into_iter()
    }
    pub fn reserved(&self) -> impl Iterator<Item = Reserved> {
        core::iter::empty()
    }
    pub fn is_available(&self, _s: u64, _e: u64) -> bool {
        true
    }
}
pub fn load(magic: u64, _info: u64) -> Result<Boot, &'static str> {
    log::info!("magic {magic:#x}");
    Ok(Boot {
        loader: "shim",
        cmdline: "",
        options: Options { log_level: log::LevelFilter::Trace, cpus: None, test: Some("all") },
        rsdp_paddr: None,
    })
}
