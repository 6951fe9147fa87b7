"""Process launchers of the local and emulator profiles: server, worker, fork server, database."""
