"""Simulated vendor systems (HIS, LIS, PACS) that tests and the demo run as real processes.

Each one behaves like a vendor product a member hospital might run: its own database or
socket protocol, its own codes and quirks. Hutong never imports these; they stand on the
hospital side of an adapter.
"""
