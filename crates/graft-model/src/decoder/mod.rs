//! The pre-norm causal decoder shared by the Llama family and ChatGLM: its plan (spec and
//! tensor names, from a config alone), the graph built from it, and generation's cache.
mod cache;
mod graph;
mod plan;

pub use cache::KvCache;
pub use graph::{Block, Decoder, DecoderInputs};
pub use plan::{
    BlockOf, BlockPlan, DecoderSpec, GateUp, Llama3Scaling, Plan, Qkv, RopeSpec, SiteSpec,
};
