"""Helpers shared by the test suites: a real server process and a KCP client."""
