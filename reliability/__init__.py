"""Reliability drills (not tests): training killed at random moments, and what it leaves behind."""
