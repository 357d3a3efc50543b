//! Meta webhooks on `/hooks/meta` (CHANNELS.md). Not implemented yet: the route answers 404.

use super::{Channel, Inbound};
use crate::error::{Reason, Rejection};
use crate::http::Resp;
use crate::pipeline::{Pipeline, RequestCtx};
use futures_util::future::BoxFuture;
use hyper::http::request::Parts;
use serde::{Deserialize, Serialize};

pub const NAME: &str = "meta";
pub const ROUTE: &str = "/hooks/meta";

/// `[meta]` in the config file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetaConfig {}

pub struct Meta {
    _cfg: MetaConfig,
    _normalizer: crate::identity::Normalizer,
}

impl Meta {
    pub fn new(cfg: MetaConfig, normalizer: crate::identity::Normalizer) -> Result<Self, String> {
        Ok(Self {
            _cfg: cfg,
            _normalizer: normalizer,
        })
    }
}

impl Channel for Meta {
    fn name(&self) -> &'static str {
        NAME
    }

    fn allow(&self) -> &'static str {
        "GET, POST"
    }

    fn precheck(&self, _parts: &Parts, _ctx: &RequestCtx) -> Result<(), Rejection> {
        Err(Rejection::new(
            Reason::NotFound,
            "channel not implemented yet",
        ))
    }

    fn handle<'a>(
        &'a self,
        _inbound: Inbound,
        _pipeline: &'a Pipeline,
    ) -> BoxFuture<'a, Result<Resp, Rejection>> {
        Box::pin(async {
            Err(Rejection::new(
                Reason::NotFound,
                "channel not implemented yet",
            ))
        })
    }
}
