#![allow(dead_code)]

pub mod registry;
pub mod fault_proxy;
