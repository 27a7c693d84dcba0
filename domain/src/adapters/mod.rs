//! Implementations of the storage ports. Both adapters have the same rooms, one per port —
//! `event_store`, `pool_view`, `view_store`, `feed` — plus `tables` (schema / table definitions),
//! so a change to one port's behaviour is made in the same-named file of each.

pub mod dynamo;
pub mod embedded;
