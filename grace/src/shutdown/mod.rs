//! The stop: the state a server shares ([`shared`]), the [`Handle`] that controls it from
//! code ([`handle`]), and the drain itself, phase by phase ([`drain`]).

pub(crate) mod drain;
pub(crate) mod handle;
pub(crate) mod shared;

pub use handle::Handle;
pub(crate) use shared::{Named, Shared};
