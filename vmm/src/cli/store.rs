//! `pmsnap store ...`: offline commands on a pool's snapshot store.

use clap::Args;

/// Arguments of `pmsnap store`.
#[derive(Debug, Args)]
pub struct StoreArgs {}

/// Run `pmsnap store`.
pub fn run(_args: StoreArgs) -> super::anyhow_like::Result<i32> {
    Err("pmsnap store is not built yet".into())
}
