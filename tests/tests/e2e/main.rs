//! End-to-end tests: one binary, one module per area of behaviour.

mod agent;
mod audit;
mod backbone;
mod identity;
mod operations;
mod policy;
mod restart;
