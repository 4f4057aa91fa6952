//! sea-orm entities: one module per table. Column sizes here match the
//! migration and are what the API checks input against.

/// Maximum length of `location`, `tag`, `sender` and `description`.
pub const TEXT_COLUMN_MAX: usize = 255;
/// Length of an address (`addr.a`).
pub const ADDR_LEN: usize = 64;
/// Maximum length of a plugin name.
pub const PLUGIN_NAME_MAX: usize = 40;

/// Addresses that senders push to.
pub mod addr {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "addr")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        #[sea_orm(unique)]
        pub a: String,
        pub active: i16,
        pub lim_c: i64,
        pub lim_s: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(has_many = "super::endpoint::Entity")]
        Endpoint,
    }

    impl Related<super::endpoint::Entity> for Entity {
        fn to() -> RelationDef {
            Relation::Endpoint.def()
        }
    }

    impl ActiveModelBehavior for ActiveModel {}
}

/// Endpoints: a plugin and its per-endpoint config, owned by an address.
pub mod endpoint {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "endpoint")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub addr_id: i64,
        pub plugin_name: String,
        pub config: Json,
        pub active: i16,
        pub description: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(
            belongs_to = "super::addr::Entity",
            from = "Column::AddrId",
            to = "super::addr::Column::Id",
            on_delete = "Cascade"
        )]
        Addr,
        #[sea_orm(has_many = "super::subscription::Entity")]
        Subscription,
    }

    impl Related<super::addr::Entity> for Entity {
        fn to() -> RelationDef {
            Relation::Addr.def()
        }
    }

    impl Related<super::subscription::Entity> for Entity {
        fn to() -> RelationDef {
            Relation::Subscription.def()
        }
    }

    impl ActiveModelBehavior for ActiveModel {}
}

/// Subscriptions: which events of the address an endpoint receives.
pub mod subscription {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "subscription")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub endpoint_id: i64,
        pub active: i16,
        pub location: Option<String>,
        pub tag: Option<String>,
        pub sender: Option<String>,
        pub level: i16,
        pub level_match: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(
            belongs_to = "super::endpoint::Entity",
            from = "Column::EndpointId",
            to = "super::endpoint::Column::Id",
            on_delete = "Cascade"
        )]
        Endpoint,
    }

    impl Related<super::endpoint::Entity> for Entity {
        fn to() -> RelationDef {
            Relation::Endpoint.def()
        }
    }

    impl ActiveModelBehavior for ActiveModel {}
}

/// Bucket objects: immutable blobs plugins store, optionally public.
pub mod bucket {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "bucket")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub creator: String,
        pub addr_id: Option<i64>,
        pub mimetype: String,
        pub fname: Option<String>,
        pub size: i64,
        pub public: bool,
        pub metadata: Option<Json>,
        pub d: ChronoDateTimeUtc,
        pub da: Option<ChronoDateTimeUtc>,
        /// Lifetime in seconds from `d`, as the original stores it.
        pub expires: i64,
        /// `d + expires`, kept so expiry is one indexed comparison on every backend.
        pub expires_at: ChronoDateTimeUtc,
        pub content: Vec<u8>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Per-address limit counters for the current window, shared by every
/// server on the same database.
pub mod addr_limit {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "addr_limit")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub addr_id: i64,
        /// Start of the current window, seconds since the Unix epoch.
        pub window_start: i64,
        pub count: i64,
        pub size: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Accepted events, stored before the push is answered.
pub mod event {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "event")]
    pub struct Model {
        /// The event id (a UUID), sent to plugins as `event_id`.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub addr_id: i64,
        /// The address as it was pushed to.
        pub addr: String,
        pub msg: String,
        pub subject: String,
        pub formatted_subject: String,
        pub level: i16,
        pub location: Option<String>,
        pub tag: Option<String>,
        pub sender: Option<String>,
        /// Stored once per event, whatever the number of deliveries.
        pub media: Option<Vec<u8>>,
        pub media_fname: Option<String>,
        pub created: ChronoDateTimeUtc,
        /// How many Roboger servers forwarded it before this one took it.
        pub hops: i16,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}

    #[cfg(test)]
    impl Model {
        /// An event `id` to address 1 (`a`), made now, with its text
        /// empty and no media (for tests).
        pub(crate) fn sample(id: &str) -> Model {
            Model {
                id: id.into(),
                addr_id: 1,
                addr: "a".into(),
                msg: String::new(),
                subject: String::new(),
                formatted_subject: String::new(),
                level: 20,
                location: None,
                tag: None,
                sender: None,
                media: None,
                media_fname: None,
                created: chrono::Utc::now(),
                hops: 0,
            }
        }
    }
}

/// One event to one endpoint: pending, delivered or failed.
pub mod delivery {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "delivery")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub event_id: String,
        pub endpoint_id: i64,
        /// `pending`, `delivered` or `failed`.
        pub state: String,
        pub attempts: i32,
        /// When a pending delivery is due.
        pub next_at: ChronoDateTimeUtc,
        /// Until when the server named by `leased_by` owns it.
        pub lease_until: Option<ChronoDateTimeUtc>,
        pub leased_by: Option<String>,
        pub last_error: Option<String>,
        pub created: ChronoDateTimeUtc,
        pub updated: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Every running server (node) of the cluster, by instance: a process
/// start, named by its configured `node` plus a part unique to the start.
pub mod node {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "node")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub instance: String,
        pub name: String,
        pub version: String,
        pub started: ChronoDateTimeUtc,
        /// Written every heartbeat interval while the node runs.
        pub heartbeat: ChronoDateTimeUtc,
        /// When another node freed this dead node's leases.
        pub rescued: Option<ChronoDateTimeUtc>,
        /// The newest routing change this node obeys: a node that makes
        /// a change answers it once every live node's is as new.
        pub routing_version: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The one-row counter that orders routing changes: a change increments it
/// under the row's lock, so changes commit in version order.
pub mod routing_version {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "routing_version")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        pub version: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// One routing change: the address whose routes changed (`None`: all).
pub mod routing_change {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "routing_change")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub version: i64,
        pub addr_id: Option<i64>,
        pub created: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A deletion of history answered before it ended: an address's
/// (`addr_id`), an endpoint's (`addr_id` and `endpoint_id`), or every
/// address's (neither); the node instance running it, if any.
pub mod deletion {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "deletion")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub addr_id: Option<i64>,
        pub endpoint_id: Option<i64>,
        pub node: Option<String>,
        pub created: ChronoDateTimeUtc,
        /// A `delete-everything`'s highest address id to delete (none:
        /// every address).
        pub up_to: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Who runs a periodic job (e.g. `cleanup`) until when.
pub mod job_lease {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "job_lease")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        pub holder: Option<String>,
        pub until: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A web console session: the SHA-256 of its cookie, its forms' CSRF
/// token, and when it ends.
pub mod console_session {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "console_session")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub csrf: String,
        pub created: ChronoDateTimeUtc,
        pub expires: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Wrong master keys from one client address since its last right one
/// (`store::wrong_keys`; the table is named for the console's sign-in,
/// which counted them first).
pub mod console_signin {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "console_signin")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub ip: String,
        pub failures: i32,
        pub last_failure: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
