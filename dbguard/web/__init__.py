"""The status page and metrics of a site: `dbguard web`, started by `dbguard up`.

One thread (`watch.SiteWatcher`) asks the lease service for every project's status and for new
history events about once a second; the web server (`app`) only reads its latest snapshot, so
any number of open pages cost the lease service nothing more. `/metrics` (`metrics`) is the
same snapshot in the Prometheus text format.
"""
