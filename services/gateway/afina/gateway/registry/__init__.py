"""The registry rows every request reads (key grants, models, routes), kept in memory while still current."""
