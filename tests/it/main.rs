//! Integration tests: real gateway nodes on free ports, real WebSocket
//! clients, and a real `redis-server` started by each test that needs one.

mod util;

mod abuse;
mod api;
mod auth;
mod browser;
mod canary;
mod cluster;
mod config;
mod edge;
mod fanout;
mod frames;
mod history;
mod json;
mod lb;
mod lifecycle;
mod limits;
mod metrics;
mod nginx;
mod outage;
mod presence;
mod raw;
mod recovery;
mod redis_cluster;
mod slow;
mod stack;
mod tls;
