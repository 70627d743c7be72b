//! The NBD server in front of the engine (issue 3). Not implemented yet.
