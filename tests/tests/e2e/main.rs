//! End-to-end tests: one binary, one module per area of behaviour.

mod audit;
mod agent;
mod backbone;
mod identity;
mod operations;
mod policy;
mod restart;
