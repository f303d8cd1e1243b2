//! Certificates and the mutual-TLS configuration shared by every ftvm service.
