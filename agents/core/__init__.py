"""The pure scheduling core: plain Python, no I/O, no clock, no asyncio.

Functions take the current time as an argument and return decisions; agents read the clock,
call the core and carry the decisions out against Kafka and PostgreSQL.
"""
