//! The CNI plugin alone (`gingham cni install` installs it as `gingham` and `gingham-ipam`):
//! the same code as `gingham` run with CNI_COMMAND set, in a binary a tenth of the size, so a
//! runtime's exec of it costs less.

use std::process::ExitCode;

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let name = std::path::Path::new(&argv0).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    gingham_cni::plugin::main(name.ends_with("-ipam"))
}
