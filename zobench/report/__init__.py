"""zobench-report: reads run directories only (never torch or the runner), so it runs anywhere."""
