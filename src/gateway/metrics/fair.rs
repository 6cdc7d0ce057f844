//! The tenants' fair-shedding gauges, computed from the [`FairBook`] when scraped.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, Opts};

use crate::gateway::fair::FairBook;
use crate::limiter::Clock;

/// Per model and tenant: name and help.
pub(super) const TENANT_GAUGES: [(&str, &str); 3] = [
    (
        "sluice_tenant_use_tokens_per_second",
        "The tenant's use of the model: tokens (prompt plus output) it offered a second, a moving rate with a 10 s time constant; requests count at arrival with their estimate and are settled to what they used when they end. Divide by the sum over tenants for its share of use.",
    ),
    (
        "sluice_tenant_fair_share_tokens_per_second",
        "The tenant's max-min fair share of the tokens the gate admits, weighted; +Inf while nothing is being shed. A tenant using more than its share is shed first.",
    ),
    (
        "sluice_tenant_shed_ratio",
        "The fraction of the tenant's recent requests for the model shed by the latency gate (moving rates, 10 s time constant).",
    ),
];

pub(super) struct FairCollector {
    book: Arc<FairBook>,
    clock: Arc<dyn Clock>,
    descs: Vec<Desc>,
}

fn gauge(name: &str, help: &str) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), &["model", "tenant"]).unwrap()
}

impl FairCollector {
    pub(super) fn new(book: Arc<FairBook>, clock: Arc<dyn Clock>) -> Self {
        let descs = (TENANT_GAUGES.iter())
            .flat_map(|(n, h)| gauge(n, h).desc().into_iter().cloned().collect::<Vec<_>>())
            .collect();
        FairCollector { book, clock, descs }
    }
}

impl Collector for FairCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let gauges = TENANT_GAUGES.map(|(n, h)| gauge(n, h));
        for s in self.book.standings(self.clock.now()) {
            let values = [s.use_rate, s.fair_share, s.shed_fraction];
            for (g, v) in gauges.iter().zip(values) {
                g.with_label_values(&[s.model.as_str(), &*s.tenant]).set(v);
            }
        }
        gauges.iter().flat_map(|g| g.collect()).collect()
    }
}
