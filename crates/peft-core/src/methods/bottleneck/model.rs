//! Attaching a bottleneck adapter to a model (AdapterHub's `add_adapter`).

use burn::tensor::backend::Backend;

use super::config::BnConfig;
use super::layer::BottleneckAdapter;
use crate::error::{PeftError, Result};
use crate::site::AdapterHost;

/// Adds bottleneck adapter `name` at every sub-layer site `config` applies to (`mh_adapter`,
/// `output_adapter`, `cross_adapter`, `leave_out`). Returns the site paths; on error nothing is
/// left attached.
pub fn attach<B: Backend, M: AdapterHost<B>>(
    host: &mut M,
    name: &str,
    config: &BnConfig,
) -> Result<Vec<String>> {
    config.validate()?;
    let mut device = None;
    host.visit_linears(&mut |_, l| {
        device.get_or_insert_with(|| l.weight.lazy_device());
    });
    let device = device.unwrap_or_default();
    let mut result = Ok(());
    let mut sites = Vec::new();
    host.visit_sublayers_mut(&mut |site, adapters| {
        if result.is_err() || !config.applies_to(site) {
            return;
        }
        result = BottleneckAdapter::new(name, config, site, &device).and_then(|a| adapters.add(a));
        sites.push(site.path.clone());
    });
    if let Err(e) = result {
        host.visit_sublayers_mut(&mut |_, adapters| adapters.delete(name));
        return Err(e);
    }
    if sites.is_empty() {
        return Err(PeftError::InvalidConfig(format!(
            "bottleneck adapter `{name}` has no site in this model (mh_adapter, output_adapter, \
             cross_adapter and leave_out leave none)"
        )));
    }
    Ok(sites)
}
