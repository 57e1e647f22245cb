"""What serving reads and keeps on disk: the verified bundle (`bundle`), the live feature store
(`store`, SQLite) and the state folder that holds it apart from the bundle (`state`)."""
