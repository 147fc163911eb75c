"""Which runner processes live: started on demand, shared, restarted after a crash."""
