"""The monitoring stage (ml_monitor): drift of new data and of served traffic against the champion's training
data, and its performance on late labels (``monitor``), the statistics and report (``drift``), and the labels
joined to what the endpoint served (``feedback``)."""
