//! `cluster` (scripts/cluster): not moved onto the launcher yet.

/// Not yet: scripts/cluster still runs the cluster.
pub async fn up(
    _sup: &mut crate::supervisor::Supervisor,
    _layout: &crate::Layout,
) -> anyhow::Result<std::convert::Infallible> {
    anyhow::bail!("versus-xtask cluster: not yet; run scripts/cluster")
}
