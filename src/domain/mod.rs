//! Pure rules of the OTP lifecycle: no I/O, time passed in.

pub mod api_key;
pub mod code;
pub mod limits;
pub mod message;
pub mod phone;
pub mod policy;
pub mod purpose;
pub mod verification;

pub use api_key::{ApiKey, ApiKeyRecord};
pub use code::{Code, CodeGenerator, OsCodeGenerator};
pub use message::{DeliveryStatus, MessageRecord};
pub use phone::{PhoneNumber, TypedNumber};
pub use policy::{GuardPolicy, Policy};
pub use purpose::Purpose;
pub use verification::{Dialect, SendOptions, Status, SubjectKey, Verification};
