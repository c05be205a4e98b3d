"""Unix-socket plumbing: peer credentials and the relay that hands them to gRPC handlers."""
