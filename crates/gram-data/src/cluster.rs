//! gram-data's plans on a [`Target`]: sessions that know [`crate::udf::functions`].

use datafusion::common::Result as DfResult;
use datafusion::prelude::SessionContext;
pub use gram_session::Target;

/// A session on `target` whose plans may call gram-data's functions.
pub async fn connect(target: &Target) -> DfResult<SessionContext> {
    target.connect(&crate::udf::functions()).await
}
