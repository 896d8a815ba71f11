//! gram-data's plans on a [`Target`]: sessions that know [`crate::udf::functions`] and the
//! plan nodes that read the sources ([`crate::scan`]) and write the shards ([`crate::sink`]).

use std::sync::Arc;

use datafusion::common::Result as DfResult;
use datafusion::prelude::SessionContext;
pub use gram_session::Target;

/// What gram-data's plans add to a session.
pub fn extensions() -> gram_session::Extensions {
    gram_session::Extensions {
        functions: crate::udf::functions(),
        nodes: vec![
            Arc::new(gram_session::work::WorkNode(Arc::new(
                crate::scan::ScanWork,
            ))),
            Arc::new(crate::sink::SinkNode),
        ],
    }
}

/// A session on `target` whose plans may use gram-data's functions and nodes, in
/// `partitions` partitions (None: the target's default).
pub async fn connect(target: &Target, partitions: Option<usize>) -> DfResult<SessionContext> {
    target.connect(&extensions(), partitions).await
}
